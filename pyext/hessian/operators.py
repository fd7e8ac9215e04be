"""Curvature operators of a model's mean token loss, and the layer proxy Hessian.

* :class:`ModelHessian`   H = d^2 L / d theta^2 of the mean token cross-entropy (nats) on a batch;
  Hessian-vector products by double backward through a cached gradient graph (Pearlmutter 1994),
  a block of ``probe_block`` probes per backward (``is_grads_batched``), or by ``torch.func``
  forward-over-reverse with ``vmap`` over the probe block (``method="func"``).
* :class:`GaussNewton`    G = J^T H_out J, the PSD generalized Gauss-Newton matrix of the same
  loss (Schraudolph 2002), with J v by the double-vjp trick.
* :class:`ProxyHessian`   H = X^T X / n for layer inputs X [n, d] (QuIP, Chee et al. 2023; GPTQ);
  applied as X^T (X V) / n in row chunks so H is never formed, with in-kernel Rademacher probes for
  Hutchinson (:func:`tokenbounds.ops.gram.rademacher_matmul`).

All satisfy the ``matmat(V) -> H @ V`` protocol of :mod:`tokenbounds.hessian.estimators`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.gram import gram_accumulate_, rademacher_matmul, symmetrize_upper
from .taylor import TaylorTape, UnsupportedOp

Batch = tuple[torch.Tensor, torch.Tensor]
METHODS = ("auto", "autograd", "func")
QUADRATIC_PATHS = ("auto", "taylor", "hvp")
# Default probe block: as many probes as keep ~4 [k, n] blocks (probes, products, directions,
# gradients) within this budget, at most MAX_PROBE_BLOCK (one pass for the usual 12-16 probes).
PROBE_BLOCK_BYTES = 1 << 30
MAX_PROBE_BLOCK = 16
# method="auto": blocks of at least this many probes use torch.func (see ModelHessian).
FUNC_MIN_BLOCK = 16


def _sdpa_math():
    """Double backward of scaled_dot_product_attention exists only for the math backend on CPU."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()


def _load_jvp_decompositions() -> None:
    """Import torch's forward-AD decompositions with its ``torch.jit.script`` deprecation silenced.

    torch loads them lazily on the first ``make_dual`` (any ``torch.func.jvp``), scripting each
    with ``torch.jit.script``, which warns once per op (12 DeprecationWarnings from inside torch,
    nothing a caller can act on). Importing the module here first makes torch's import a no-op.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def split_tokens(tokens: torch.Tensor) -> Batch:
    """[B, T + 1] token ids -> (inputs [B, T], next-token targets [B, T])."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got shape {tuple(tokens.shape)}")
    return tokens[:, :-1], tokens[:, 1:]


def _as_batch(batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return split_tokens(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], batch[1]
    raise TypeError("batch must be a [B, T+1] token tensor or an (inputs, targets) pair of tensors")


def model_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of a tokenbounds GPT or a Hugging Face causal LM (``.logits``)."""
    out = model(inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over targets != -100."""
    logits = model_logits(model, inputs)
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _select_params(model: nn.Module, params) -> tuple[list[str], list[torch.Tensor]]:
    named = dict(model.named_parameters())  # tied weights appear once
    if params is None:
        names = [k for k, p in named.items() if p.requires_grad]
    elif all(isinstance(p, str) for p in params):
        names = list(params)
        unknown = [k for k in names if k not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown[:5]}; see model.named_parameters()")
    else:
        ids = {id(p): k for k, p in named.items()}
        missing = [i for i, p in enumerate(params) if id(p) not in ids]
        if missing:
            raise ValueError(f"params[{missing[0]}] is not a parameter of the model")
        names = [ids[id(p)] for p in params]
    if not names:
        raise ValueError("no parameters selected (none requires grad?)")
    return names, [named[k] for k in names]


class _ModelOperator:
    """Common plumbing: parameter selection, probe-major [k, n] blocks, per-parameter views."""

    def __init__(self, model, batches, *, params, probe_block: int | None, quadratic: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(batches, torch.Tensor) or (
            isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor)
        ):
            batches = [batches]
        if not isinstance(batches, Sequence) or len(batches) == 0:
            raise ValueError("batches must be a batch or a non-empty list of batches")
        if probe_block is not None and (isinstance(probe_block, bool) or not isinstance(probe_block, int)
                                        or probe_block < 1):
            raise ValueError(f"probe_block must be a positive int or None, got {probe_block!r}")
        if quadratic not in QUADRATIC_PATHS:
            raise ValueError(f"quadratic must be one of {QUADRATIC_PATHS}, got {quadratic!r}")
        self.model = model
        self.batches = [_as_batch(b) for b in batches]
        self.names, self.params = _select_params(model, params)
        self.sizes = [p.numel() for p in self.params]
        n = sum(self.sizes)
        self.shape = (n, n)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        if probe_block is None:
            probe_block = max(1, min(MAX_PROBE_BLOCK, PROBE_BLOCK_BYTES // (4 * n * self.params[0].element_size())))
        self.probe_block = probe_block
        self.quadratic = quadratic
        self.taylor_unsupported: str | None = None  # why quadratic="auto" fell back to matvecs
        self.cache_graph = True
        self._tapes: dict[int, TaylorTape] = {}
        # Tied weights (e.g. GPT's lm_head.weight = tok_emb.weight) appear once in named_parameters;
        # torch.func.functional_call needs every alias replaced explicitly.
        canonical = {id(p): k for k, p in zip(self.names, self.params, strict=True)}
        self.aliases = {
            k: canonical[id(p)]
            for k, p in model.named_parameters(remove_duplicate=False)
            if id(p) in canonical and k != canonical[id(p)]
        }

    def _param_dict(self, tensors) -> dict:
        theta = dict(zip(self.names, tensors, strict=True))
        theta.update({alias: theta[name] for alias, name in self.aliases.items()})
        return theta

    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _unflat(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view_as(p) for c, p in zip(torch.split(v, self.sizes), self.params, strict=True)]

    def _per_param(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Probe-major rows [k, n] -> one [k, *p.shape] view per parameter (no copies)."""
        k = rows.shape[0]
        return [c.view(k, *p.shape) for c, p in zip(rows.split(self.sizes, dim=1), self.params, strict=True)]

    @staticmethod
    def _store(dst: list[torch.Tensor], parts, accumulate: bool) -> None:
        """dst[i] (+)= parts[i]; a None part (parameter not reached) is zero."""
        for d, h in zip(dst, parts, strict=True):
            if h is None:
                if not accumulate:
                    d.zero_()
            elif accumulate:
                d.add_(h)
            else:
                d.copy_(h)

    def _blocks(self, V: torch.Tensor):
        """Probe-major [k_block, n] copies of the column blocks of V [n, k]."""
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"V must be [{self.shape[0]}, k], got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        for start in range(0, V.shape[1], self.probe_block):
            yield start, V[:, start:start + self.probe_block].T.contiguous()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        # Probe-major [k, n] output: every backward yields [k_block, *p.shape] blocks that are
        # copied (or added) straight into their rows; callers get the [n, k] view.
        out_t = torch.empty((V.shape[1], self.shape[0]), dtype=self.dtype, device=self.device)
        for start, block in self._blocks(V):
            rows = out_t[start:start + block.shape[0]]
            dst = self._per_param(rows)
            for b, batch in enumerate(self.batches):
                self._apply_block(b, batch, block, dst, accumulate=b > 0)
            if len(self.batches) > 1:
                rows.div_(len(self.batches))
        return out_t.T

    def quadratic_forms(self, V: torch.Tensor) -> torch.Tensor:
        """v_c^T H v_c for every column of V [n, k] (float64 [k]); what Hutchinson needs.

        With ``quadratic="taylor"`` (or "auto" when every op of the forward has a rule) these come
        from second-order forward mode (:mod:`tokenbounds.hessian.taylor`), never forming H v.
        """
        if self.quadratic != "hvp" and self.taylor_unsupported is None:
            try:
                return self._taylor_forms(V)
            except UnsupportedOp as err:
                if self.quadratic == "taylor":
                    raise ValueError(f"quadratic='taylor' is not available for this model: {err}; "
                                     "use quadratic='hvp' (or 'auto', which falls back to it)") from err
                self.taylor_unsupported = str(err)
        out = [(self.matmat(block.T) * block.T).sum(0, dtype=torch.float64) for _, block in self._blocks(V)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    @property
    def quadratic_path(self) -> str:
        """'taylor' or 'hvp': how :meth:`quadratic_forms` computes (the last call for "auto")."""
        return "hvp" if self.quadratic == "hvp" or self.taylor_unsupported is not None else "taylor"

    def _taylor_forms(self, V: torch.Tensor) -> torch.Tensor:
        out = []
        for _, block in self._blocks(V):
            dirs = self._per_param(block)
            acc = torch.zeros(block.shape[0], dtype=torch.float64, device=self.device)
            for b, batch in enumerate(self.batches):
                acc += self._taylor_block(b, batch, dirs).to(torch.float64)
            out.append(acc / len(self.batches))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def _tape(self, b: int, make: Callable[[], TaylorTape]) -> TaylorTape:
        """The batch's recorded forward (and adjoints), kept across probe blocks when ``cache_graph``."""
        tape = self._tapes.get(b)
        if tape is None:
            tape = make()
            if self.cache_graph:
                self._tapes[b] = tape
        return tape

    def _taylor_block(self, b: int, batch: Batch, dirs: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _apply_block(self, b: int, batch: Batch, block: torch.Tensor, dst: list[torch.Tensor],
                     accumulate: bool) -> None:  # pragma: no cover
        raise NotImplementedError


class ModelHessian(_ModelOperator):
    """Hessian of the mean token loss w.r.t. the selected parameters (flattened, in named order).

    Args:
        model: an ``nn.Module`` mapping token ids [B, T] to logits [B, T, V] (or ``.logits``).
        batches: one batch or a list; each is a [B, T + 1] token tensor or an (inputs, targets)
            pair. With several batches H is the average of the per-batch Hessians.
        loss_fn: ``loss_fn(model, inputs, targets) -> scalar``; default mean cross-entropy (nats).
        params: parameters or their names (default: all that require grad).
        method: how H V is formed. "autograd": double backward through the gradient graph, built
            once per batch and cached when ``cache_graph``, ``probe_block`` probes per backward
            (``is_grads_batched``). "func": torch.func jvp of grad, vmapped over the probe block.
            "auto" (default): per block, "func" for blocks of at least ``FUNC_MIN_BLOCK`` probes
            and "autograd" for smaller ones (the faster of the two for each size on the benchmark
            GPT: is_grads_batched runs on torch's legacy vmap, which loops over the probes for
            the backward of softmax, GELU, LayerNorm and embeddings, while torch.func re-runs
            the forward and first backward once per block); "func" errors fall back to
            "autograd", and a backward without a batching rule to one probe per backward.
        probe_block: probes per pass; default: up to 16, as many as keep four [k, n] blocks
            within 1 GiB (1 for a 135M-parameter float32 model).
        quadratic: how :meth:`quadratic_forms` (Hutchinson's z^T H z) is computed: "taylor"
            (second-order forward mode, no H z), "hvp" (z . H z) or "auto" (default: taylor
            unless the forward reaches an op without a Taylor rule; see ``taylor_unsupported``).
    """

    def __init__(self, model: nn.Module, batches, *, loss_fn: Callable | None = None, params=None,
                 method: str = "auto", probe_block: int | None = None, cache_graph: bool = True,
                 quadratic: str = "auto"):
        super().__init__(model, batches, params=params, probe_block=probe_block, quadratic=quadratic)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.loss_fn = loss_fn or token_loss
        self.method = method
        self._func_ok = True
        self.cache_graph = cache_graph
        self._grads: dict[int, tuple] = {}
        self._batched_ok = True

    def _loss(self, theta: dict, batch: Batch) -> torch.Tensor:
        with _sdpa_math():
            return self.loss_fn(_Functional(self.model, theta), *batch)

    def _grad_graph(self, b: int, batch: Batch) -> tuple:
        if b in self._grads:
            return self._grads[b]
        with _sdpa_math(), torch.enable_grad():
            loss = self.loss_fn(self.model, *batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
        if self.cache_graph:
            self._grads[b] = grads
        return grads

    def gradient(self) -> torch.Tensor:
        """Flat mean gradient over the batches (detached)."""
        total = sum(self._flat([g.detach() for g in self._grad_graph(b, bt)]) for b, bt in enumerate(self.batches))
        return total / len(self.batches)

    def method_for(self, k: int) -> str:
        """The HVP path a block of k probes takes ("autograd" or "func")."""
        if self.method != "auto":
            return self.method
        return "func" if k >= FUNC_MIN_BLOCK and self._func_ok else "autograd"

    def _apply_block(self, b, batch, block, dst, accumulate):
        method = self.method_for(block.shape[0])
        if method == "func":
            try:
                rows = self._apply_func(batch, block)
            except (RuntimeError, NotImplementedError):
                if self.method == "func":
                    raise
                self._func_ok = False  # e.g. an op without a forward-mode or vmap rule
            else:
                self._store(dst, self._per_param(rows), accumulate)
                return
        grads = self._grad_graph(b, batch)
        # A gradient that does not depend on the parameters (no graph) has zero derivative.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            self._store(dst, [None] * len(dst), accumulate)
            return
        outputs = [grads[i] for i in live]
        dirs = self._per_param(block)
        k = block.shape[0]
        if k > 1 and self._batched_ok:
            try:
                hv = torch.autograd.grad(outputs, self.params, [dirs[i] for i in live], retain_graph=True,
                                         is_grads_batched=True, allow_unused=True)
                self._store(dst, hv, accumulate)
                return
            except RuntimeError:
                self._batched_ok = False  # some op lacks a batching rule: one probe at a time
        for c in range(k):
            hv = torch.autograd.grad(outputs, self.params, [dirs[i][c] for i in live], retain_graph=True,
                                     allow_unused=True)
            self._store([d[c] for d in dst], hv, accumulate)

    def _apply_func(self, batch, block):
        """[k, n] rows H v_c by forward-over-reverse, vmapped over the probe block."""
        from torch.func import grad, jvp, vmap

        flat0 = self._flat([p.detach() for p in self.params])

        def f(flat):
            return self._loss(self._param_dict(self._unflat(flat)), batch)

        _load_jvp_decompositions()

        def hvp(v):
            return jvp(grad(f), (flat0,), (v,))[1]

        return vmap(hvp)(block)

    def _taylor_block(self, b, batch, dirs):
        tape = self._tape(b, lambda: TaylorTape(lambda ps: self._loss(self._param_dict(ps), batch), self.params))
        return tape.push(dirs)[1]


class _Functional(nn.Module):
    """Calls ``model`` with some parameters replaced (torch.func.functional_call)."""

    def __init__(self, model: nn.Module, theta: dict):
        super().__init__()
        self._model = [model]
        self._theta = theta

    def forward(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self._model[0], self._theta, args, kwargs, tie_weights=False)


def _softmax_quadratic(logits: torch.Tensor, targets: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """u_c^T H_out u_c for H_out = blockdiag_t (diag p_t - p_t p_t^T) / N over valid tokens.

    logits [N, V], targets [N], U [k, N, V] -> [k] float64.
    """
    valid = (targets.reshape(-1) != -100).to(logits.dtype)
    probs = torch.softmax(logits, dim=-1) * valid[:, None]
    count = valid.sum().clamp_min(1)
    pu = probs * U  # masked rows are 0 and valid is 0/1, so (sum p u)^2 needs no second mask
    per_token = (pu * U).sum(-1) - pu.sum(-1).square()
    return per_token.sum(-1, dtype=torch.float64) / count


class GaussNewton(_ModelOperator):
    """Generalized Gauss-Newton matrix G = J^T H_out J of the mean token cross-entropy (PSD).

    J = d logits / d theta; for softmax cross-entropy averaged over N valid tokens,
    H_out = blockdiag_t (diag(p_t) - p_t p_t^T) / N (Schraudolph 2002). J v uses the double-vjp
    trick (J v = d/du <J^T u, v>), so only reverse mode is needed; a block of ``probe_block``
    probes goes through each backward at once (``is_grads_batched``). The quadratic forms
    z^T G z = (J z)^T H_out (J z) need only J z: first-order forward mode when ``quadratic`` is
    "auto"/"taylor", else z . G z.
    """

    def __init__(self, model: nn.Module, batches, *, params=None, probe_block: int | None = None,
                 quadratic: str = "auto"):
        super().__init__(model, batches, params=params, probe_block=probe_block, quadratic=quadratic)
        self._cache: dict[int, tuple] = {}
        self._batched_ok = True

    @staticmethod
    def _float_logits(logits: torch.Tensor) -> torch.Tensor:
        if logits.dtype != torch.float64:
            logits = logits.float()
        return logits.reshape(-1, logits.shape[-1])

    def _graph(self, b, batch):
        if b in self._cache:
            return self._cache[b]
        inputs, targets = batch
        with _sdpa_math(), torch.enable_grad():
            logits = self._float_logits(model_logits(self.model, inputs))
            u = torch.zeros_like(logits, requires_grad=True)
            jtu = torch.autograd.grad(logits, self.params, u, create_graph=True)
        valid = (targets.reshape(-1) != -100).to(logits.dtype)
        probs = torch.softmax(logits.detach(), dim=-1) * valid[:, None]
        count = valid.sum().clamp_min(1)
        self._cache[b] = (logits, u, jtu, probs, count)
        return self._cache[b]

    def _apply_block(self, b, batch, block, dst, accumulate):
        logits, u, jtu, probs, count = self._graph(b, batch)
        dirs = [d.to(jtu[0].dtype) for d in self._per_param(block)]

        def h_out(jv):
            return (probs * jv - probs * (probs * jv).sum(-1, keepdim=True)) / count

        k = block.shape[0]
        if k > 1 and self._batched_ok:
            try:
                jv = torch.autograd.grad(jtu, u, dirs, retain_graph=True, is_grads_batched=True)[0]
                gv = torch.autograd.grad(logits, self.params, h_out(jv), retain_graph=True,
                                         is_grads_batched=True, allow_unused=True)
                self._store(dst, gv, accumulate)
                return
            except RuntimeError:
                self._batched_ok = False
        for c in range(k):
            jv = torch.autograd.grad(jtu, u, [d[c] for d in dirs], retain_graph=True)[0]
            gv = torch.autograd.grad(logits, self.params, h_out(jv), retain_graph=True, allow_unused=True)
            self._store([d[c] for d in dst], gv, accumulate)

    def _taylor_block(self, b, batch, dirs):
        inputs, targets = batch

        def logits_of(ps):
            with _sdpa_math():
                return self._float_logits(model_logits(_Functional(self.model, self._param_dict(ps)), inputs))

        tape = self._tape(b, lambda: TaylorTape(logits_of, self.params, second_order=False))
        return _softmax_quadratic(tape.out, targets, tape.push(dirs)[0])


class ProxyHessian:
    """Layer proxy Hessian H = X^T X / n (QuIP / GPTQ) as an operator that never forms H.

    ``matmat(V) = X^T (X V) / n`` in chunks of ``chunk_rows`` rows (O(chunk * k) extra memory);
    Hutchinson probes are generated inside :func:`rademacher_matmul`, so tr(H) costs one pass
    over X per probe block and no probe storage. ``dense()`` forms H with the one-triangle gram
    kernel when d is small enough.
    """

    def __init__(self, X: torch.Tensor, *, chunk_rows: int = 65536, probe_block: int = 32):
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"X must be a non-empty 2-D tensor [n, d] of layer inputs, got {getattr(X, 'shape', X)}")
        if not X.is_floating_point():
            raise TypeError(f"X must be floating point, got {X.dtype}")
        self.X = X
        self.n_rows = X.shape[0]
        d = X.shape[1]
        self.shape = (d, d)
        self.dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
        self.device = X.device
        self.chunk_rows = chunk_rows
        self.probe_block = probe_block

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(self.dtype)
        out = torch.zeros((self.shape[0], V.shape[1]), dtype=self.dtype, device=self.device)
        for s in range(0, self.n_rows, self.chunk_rows):
            xc = self.X[s:s + self.chunk_rows].to(self.dtype)
            out += xc.T @ (xc @ V)
        return out / self.n_rows

    def rademacher_quadratic_forms(self, k: int, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
        """z_c^T H z_c = ||X z_c||^2 / n for probes c = offset .. offset + k - 1 (float64)."""
        total = torch.zeros(k, dtype=torch.float64, device=self.device)
        for s in range(0, self.n_rows, self.chunk_rows):
            y = rademacher_matmul(self.X[s:s + self.chunk_rows], k, seed=seed, offset=offset)
            total += (y.to(torch.float64) ** 2).sum(0)
        return total / self.n_rows

    def trace(self) -> float:
        """Exact tr(H) = ||X||_F^2 / n."""
        return float((self.X.to(torch.float64) ** 2).sum() / self.n_rows)

    def dense(self, acc_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        acc = torch.zeros(self.shape, dtype=acc_dtype, device=self.device)
        for s in range(0, self.n_rows, self.chunk_rows):
            gram_accumulate_(acc, self.X[s:s + self.chunk_rows])
        return symmetrize_upper(acc) / self.n_rows


def collect_proxy_hessians(model: nn.Module, batches, *, layers: Sequence[str] | None = None,
                           acc_dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """H_l = X_l^T X_l / n_l for the input X_l of every ``nn.Linear`` (or the named ones).

    Inputs are captured by forward hooks and accumulated batch by batch with the one-triangle
    gram kernel (bf16/fp16 activations accumulate in ``acc_dtype``), so only H_l is kept.
    """
    if isinstance(batches, torch.Tensor) or (isinstance(batches, tuple) and len(batches) == 2):
        batches = [batches]
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is not None:
        unknown = [n for n in layers if n not in linear]
        if unknown:
            raise ValueError(f"{unknown[:3]} are not nn.Linear modules of the model; choose from {list(linear)[:8]}")
        linear = {n: linear[n] for n in layers}
    acc: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if name not in acc:
                acc[name] = torch.zeros((x.shape[1], x.shape[1]), dtype=acc_dtype, device=x.device)
                rows[name] = 0
            gram_accumulate_(acc[name], x)
            rows[name] += x.shape[0]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linear.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, _ = _as_batch(batch)
                model_logits(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: symmetrize_upper(acc[n]) / rows[n] for n in acc}
