"""quantize_model_to_tbq: a real model -> a ``.tbq`` file, layer by layer, resumable (issue 11).

What is quantized (QuIP#, Tseng et al. 2024; QuIP, Chee et al. 2023; GPTQ, Frantar et al. 2023):

* every ``nn.Linear`` (and GPT-2's ``Conv1D``, stored transposed) with the proxy Hessian
  H = E[x x^T] of its input, accumulated over the calibration tokens with the one-triangle X^T X
  kernel (:func:`tokenbounds.ops.gram.gram_accumulate_`; float32 per batch, float64 sums);
* every ``nn.Embedding`` (token and position embeddings) with a scale per row (token) and
  without incoherence processing: the Hadamard transform over the output side mixes the rows of
  frequent and rare tokens, so every token gets the same absolute error instead of an error
  proportional to its row. Measured on the tied 96 x 1024 embedding of the benchmark GPT at 2
  bits (everything else full precision): perplexity 51.1 -> 56.5 (E8) / 58.9 (uniform) without,
  66.1 / 68.3 with the two-sided transform, 56.8 / 59.7 with the input side only. An embedding
  that is not tied uses the identity Hessian (plain weight MSE). A linear weight tied to an
  embedding (the LM head of SmolLM2 and of our GPT) is coded once, with the Hessian of both its
  uses, ``(H_head / mean diag H_head + I) / 2`` (:func:`_tied_hessian`: 54.6 instead of 56.5 in
  the measurement above). Weighting tokens by their frequency (scales ~ p^-1/4 at equal rate)
  halved the frequency-weighted error there but raised the perplexity (57.6), so it is not done;
* every other tensor (norms, biases) is kept, in float16 when it fits.

Schedule. The decoder blocks (the largest ``nn.ModuleList`` of identical modules holding linear
layers) are run one at a time on cached inputs: the calibration batches are run through the
model up to block 0 once (its positional arguments and keyword arguments, e.g. rotary
embeddings and masks, are captured), then each block maps its cached inputs to the next block's.
Inside a block, the linear layers are grouped by the tensor they read (q/k/v share one H), in
execution order; a pass of the block (stopped right after the last needed input is seen)
accumulates the Hessians of as many groups as fit in ``HESSIAN_BUDGET_BYTES`` (1 GiB; one group
per pass in sequential mode), then their layers are quantized. So beyond the model only those
Hessians, one layer's codes and the cached activations (calibration tokens x width) are held.
With ``sequential=True`` each quantized group is written into the model before the next group's
Hessian is taken and before the block's outputs are computed, so every layer is calibrated on
the outputs of the already quantized ones (GPTQ's "true sequential" order); otherwise all
Hessians come from the full-precision model (as in QuIP#). Before relying on the cached chain,
it is checked once, on one sequence, against a normal forward of the model; models whose blocks
need per-block arguments fall back to one (early-stopped) forward of the whole model per group.
Linear layers outside the blocks (an untied LM head) get their H from a forward of the whole
model that stops at them.

Resume. With ``partial_dir``, each quantized tensor is written there atomically as soon as it is
done (a checksummed :class:`~tokenbounds.quant.tbq.TensorRecord`), next to a ``run.json`` that
fixes the run (architecture, settings, a hash of the weights and of the calibration tokens). A
killed run restarted with the same arguments reloads the finished tensors (in sequential mode
writing them into the model, so the activations are recomputed bit for bit) and produces the
same bytes, given the same torch build and thread count.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .tbq import (
    TBQ,
    TBQError,
    TensorRecord,
    apply_tbq,
    architecture_of,
    atomic_write_bytes,
    encode_tbq,
    parse_tbq,
    raw_record,
    tied_record,
    weight_record,
)
from .weight import check_quantizer_args, quantize_weight

RUN_FORMAT = "tokenbounds.quantize-run/1"

__all__ = ["QuantizeRunMismatch", "calibration_windows", "default_embedding_bits", "quantize_model_to_tbq"]


class QuantizeRunMismatch(RuntimeError):
    """``partial_dir`` holds the partial results of a different run."""


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (carries what the hook captured)."""

    def __init__(self, payload: Any = None):
        super().__init__("stop")
        self.payload = payload


# ----------------------------------------------------------------------------- model structure
def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D: y = x W + b, W [in, out]
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and getattr(m.weight, "dim", lambda: 0)() == 2


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "base_model") and hasattr(getattr(model, "config", None), "to_dict")


def _run_model(model: nn.Module, batch: torch.Tensor) -> None:
    if _is_hf(model):
        model(input_ids=batch, use_cache=False)
    else:
        model(batch)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(c) for c in mod}) != 1:
            continue
        n_lin = sum(1 for c in mod for m in c.modules() if _is_linear(m))
        if n_lin and (best is None or n_lin > best[2]):
            best = (name, mod, n_lin)
    return None if best is None else (best[0], best[1])


@dataclass
class _Target:
    """One tensor to quantize."""

    name: str  # state-dict name (the first one, when tied)
    module_name: str
    module: nn.Module
    kind: str  # "linear" | "embedding"
    seed: int
    transposed: bool = False
    block: int | None = None  # index of the decoder block holding it
    head: nn.Module | None = None  # for an embedding: the linear layer (LM head) tied to it

    def weight(self) -> torch.Tensor:
        w = self.module.weight.detach()
        return w.t() if self.transposed else w

    def install(self, w: torch.Tensor) -> None:
        """Write the decoded weight (in state-dict orientation) into the module."""
        with torch.no_grad():
            self.module.weight.copy_(w)


@dataclass
class _Plan:
    targets: list[_Target]
    names: list[str]  # every state-dict name, in order
    stored: dict[str, str]  # state-dict name -> name of the tensor it is stored as (itself unless tied)
    blocks: nn.ModuleList | None
    blocks_name: str | None


def _plan(model: nn.Module, seed: int) -> _Plan:
    sd = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    stored: dict[str, str] = {}
    for name, t in sd.items():
        stored[name] = first.setdefault(id(t), name)
    found = _find_blocks(model)
    block_of: dict[int, int] = {}
    if found is not None:
        for i, blk in enumerate(found[1]):
            for m in blk.modules():
                block_of[id(m)] = i
    modules = dict(model.named_modules())
    linears = {n: m for n, m in modules.items() if _is_linear(m)}
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no linear layers (torch.nn.Linear or transformers Conv1D) to quantize; "
            "tokenbounds quantize expects a causal language model"
        )
    embeddings = {n: m for n, m in modules.items() if isinstance(m, nn.Embedding)}
    embedding_params = {id(m.weight) for m in embeddings.values()}
    by_name: dict[str, _Target] = {}
    for mname, m in {**linears, **embeddings}.items():
        pname = stored.get(f"{mname}.weight" if mname else "weight")
        if pname is None or pname in by_name:
            continue  # not in the state dict, or the second use of a tied tensor
        kind = "embedding" if id(m.weight) in embedding_params else "linear"
        if kind == "embedding" and not isinstance(m, nn.Embedding):  # a head tied to an embedding:
            m = next(e for e in embeddings.values() if e.weight is m.weight)  # coded as the embedding
            mname = next(n for n, e in embeddings.items() if e is m)
        by_name[pname] = _Target(pname, mname, m, kind, 0, transposed=_is_conv1d(m), block=block_of.get(id(m)))
    targets = [by_name[n] for n in sd if n in by_name]  # state-dict order
    for t in targets:
        if t.kind == "embedding":
            t.head = next((m for m in linears.values() if m.weight is t.module.weight), None)
    for k, t in enumerate(targets):
        t.seed = seed + k
    return _Plan(targets, list(sd), stored, found[1] if found else None, found[0] if found else None)


# ----------------------------------------------------------------------------- calibration data
def calibration_windows(token_arrays: Sequence[np.ndarray], num_tokens: int, seq_len: int, seed: int = 0
                        ) -> torch.Tensor:
    """``ceil(num_tokens / seq_len)`` distinct windows of ``seq_len`` tokens as a LongTensor [k, seq_len].

    The windows are drawn without replacement (``numpy.random.default_rng(seed)``) from the
    non-overlapping windows of every array (a window never crosses from one file into the next).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"the number of calibration tokens must be a positive int, got {num_tokens!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"the calibration sequence length must be a positive int, got {seq_len!r}")
    total = int(sum(int(a.size) for a in token_arrays))
    if total < num_tokens:
        raise ValueError(f"the data holds {total:,} tokens, fewer than the {num_tokens:,} calibration tokens "
                         "asked for; lower --calibration-tokens or pass more data")
    k = math.ceil(num_tokens / seq_len)
    per_file = [int(a.size) // seq_len for a in token_arrays]
    if sum(per_file) < k:
        raise ValueError(f"the data holds only {sum(per_file)} non-overlapping windows of {seq_len} tokens "
                         f"(files of {[int(a.size) for a in token_arrays]} tokens), {k} are needed for "
                         f"{num_tokens:,} calibration tokens; lower --seq-len or --calibration-tokens")
    pick = np.sort(np.random.default_rng(int(seed)).choice(sum(per_file), size=k, replace=False))
    offsets = np.cumsum([0, *per_file])
    rows = []
    for w in pick:
        f = int(np.searchsorted(offsets, w, side="right") - 1)
        start = int(w - offsets[f]) * seq_len
        rows.append(np.asarray(token_arrays[f][start:start + seq_len], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))


def _as_batches(calibration_tokens, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calibration_tokens, torch.Tensor):
        t = calibration_tokens[None] if calibration_tokens.dim() == 1 else calibration_tokens
        if t.dim() != 2:
            raise ValueError(f"calibration_tokens must be [sequences, length], got shape {tuple(t.shape)}")
        batches = list(t.split(batch_size))
    else:
        batches = list(calibration_tokens)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 or b.numel() == 0 for b in batches):
        raise ValueError("calibration_tokens must be a non-empty LongTensor [sequences, length] or a list of them")
    for b in batches:
        if b.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration tokens must be int64 token ids, got {b.dtype}")
    return [b.long() for b in batches]


# ----------------------------------------------------------------------------- Hessians
class _GramHessian:
    """Streaming E[x x^T] with the one-triangle gram kernel: each batch's X^T X in float32 (3-4x
    faster than a float64 accumulator; float64 inputs stay float64), the sum over batches in
    float64, and a row count."""

    def __init__(self):
        self.acc = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        from ..ops.gram import gram_accumulate_

        x2 = x.detach().reshape(-1, x.shape[-1])
        d = x2.shape[1]
        if self.acc is None:
            self.acc = torch.zeros((d, d), dtype=torch.float64, device=x2.device)
        if x2.dtype == torch.float64:
            gram_accumulate_(self.acc, x2)
        else:
            self.acc += gram_accumulate_(torch.zeros((d, d), dtype=torch.float32, device=x2.device), x2)
        self.count += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        from ..ops.gram import symmetrize_upper

        if self.acc is None or self.count == 0:
            raise RuntimeError("no calibration input reached this layer")
        return symmetrize_upper(self.acc).div_(self.count).cpu()


def _input_hook(acc: _GramHessian, stop: bool):
    def hook(module, args):
        acc.update(args[0])
        if stop:
            raise _Stop()
    return hook


def _call_block(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class _Cached:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[_Cached]:
    def hook(module, args, kwargs):
        raise _Stop((args, dict(kwargs)))

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for b in batches:
            try:
                _run_model(model, b)
            except _Stop as s:
                args, kwargs = s.payload
                if args:
                    out.append(_Cached(args[0], tuple(args[1:]), kwargs))
                else:
                    kwargs = dict(kwargs)
                    out.append(_Cached(kwargs.pop("hidden_states"), (), kwargs))
            else:
                raise RuntimeError("the forward pass never reached the first decoder block")
    finally:
        h.remove()
    return out


def _chain_matches(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> bool:
    """Do the blocks, run one by one on cached inputs, reproduce a normal forward (one sequence)?"""
    def grab(module, args, output):
        raise _Stop(output[0] if isinstance(output, (tuple, list)) else output)

    h = blocks[-1].register_forward_hook(grab)
    try:
        try:
            _run_model(model, batch)
            return False
        except _Stop as s:
            want = s.payload
    finally:
        h.remove()
    c = _capture_block_inputs(model, blocks[0], [batch])[0]
    x = c.hidden
    for blk in blocks:
        x = _call_block(blk, x, c.args, c.kwargs)
    return bool(torch.allclose(x.float(), want.float(), rtol=1e-4, atol=1e-5 * float(want.float().abs().max()) + 1e-6))


def _group_by_input(targets: list[_Target], run: Callable[[], None]) -> list[list[_Target]]:
    """``targets`` grouped by the input tensor they read during ``run()``, in execution order."""
    order: list[tuple[tuple, _Target, torch.Tensor]] = []  # holding x: a freed input's address can be reused
    handles = []

    def hook(t):
        def fn(module, args):
            x = args[0]
            order.append(((x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype), t, x))
        return fn

    for t in targets:
        handles.append(t.module.register_forward_pre_hook(hook(t)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[_Target]] = {}
    seen = set()
    for key, t, _ in order:
        if id(t) not in seen:
            seen.add(id(t))
            groups.setdefault(key, []).append(t)
    missing = [t.name for t in targets if id(t) not in seen]
    if missing:
        raise ValueError(f"calibration never ran these linear layers (no Hessian): {missing[:5]}")
    return list(groups.values())


# ----------------------------------------------------------------------------- partial results
class _PartStore:
    """Finished tensors, in memory and (with a directory) on disk, one atomic file each."""

    def __init__(self, directory: str | None, run: dict[str, Any], restart: bool = False, log=None):
        self.directory = directory
        self.records: dict[str, TensorRecord] = {}
        self.index: dict[str, int] = {}
        if directory is None:
            return
        from ..eval.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "run.json")
        saved = None
        if not restart:
            try:
                saved = load_checkpoint(path, run)
            except CheckpointError as exc:
                raise QuantizeRunMismatch(
                    f"{directory} holds the partial results of another quantize run: {exc}; or delete "
                    f"{directory}") from None
        if saved is None:  # a new run: nothing in the directory belongs to it
            for name in os.listdir(directory):
                if name.endswith(".part"):
                    os.remove(os.path.join(directory, name))
            save_checkpoint(path, run, {})

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"{index:05d}.part")

    def load(self, index: int, name: str, log=None) -> TensorRecord | None:
        if name in self.records:
            return self.records[name]
        if self.directory is None or not os.path.exists(self._path(index)):
            return None
        with open(self._path(index), "rb") as f:
            data = f.read()
        try:
            rec = TensorRecord.from_bytes(data, self._path(index))
        except TBQError as exc:
            if log:
                log(f"redoing {name}: {exc}")
            return None
        if rec.name != name:
            return None
        self.records[name] = rec
        return rec

    def put(self, index: int, rec: TensorRecord) -> None:
        self.records[rec.name] = rec
        if self.directory is not None:
            atomic_write_bytes(self._path(index), rec.to_bytes())


def _fingerprint_state(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        c = t.detach().to("cpu").contiguous()
        if c.numel():
            h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tokens_digest(batches: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the run
@dataclass
class _Run:
    model: nn.Module
    batches: list[torch.Tensor]
    store: _PartStore
    plan: _Plan
    settings: dict[str, Any]
    sequential: bool
    bar: Any
    log: Callable[[str], None]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)

    def done(self, t: _Target) -> TensorRecord | None:
        return self.store.load(self.index[t.name], t.name, self.log)

    def quantize(self, t: _Target, hessian: torch.Tensor | None) -> TensorRecord:
        s = self.settings
        t0 = time.perf_counter()
        # Embeddings keep their rows (tokens) apart: no incoherence (see the module docstring).
        incoherence = s["incoherence"] and t.kind != "embedding"
        bits = s["embedding_bits"] if t.kind == "embedding" else s["bits"]
        qw = quantize_weight(t.weight(), hessian, bits=bits, codebook=s["codebook"], method=s["method"],
                             incoherence=incoherence, seed=t.seed, group_size=s["group_size"], damp=s["damp"])
        rec = weight_record(t.name, qw, transposed=t.transposed)
        kind = "identity" if hessian is None else ("tied: (E[h h^T] + I) / 2" if t.head is not None else "E[x x^T]")
        rec.info = {"proxy_loss": float(qw.proxy_loss), "seconds": round(time.perf_counter() - t0, 3),
                    "hessian": kind, "shape": list(qw.shape)}
        self.store.put(self.index[t.name], rec)
        slow = float(os.environ.get("TOKENBOUNDS_TEST_LAYER_SLEEP_S", "0") or 0)
        if slow:
            time.sleep(slow)
        return rec

    def finish(self, t: _Target, rec: TensorRecord, *, install: bool) -> None:
        self.info[t.name] = {**getattr(rec, "info", {}), "bits": 8.0 * len(rec.body)}
        if install:
            t.install(_decode_record(rec))
        if self.bar is not None:
            self.bar.update(1)

    def pending(self, targets: list[_Target]) -> bool:
        return any(self.done(t) is None for t in targets)

    def group(self, targets: list[_Target], hessian_fn: Callable[[], torch.Tensor | None]) -> None:
        recs = {t.name: self.done(t) for t in targets}
        todo = [t for t in targets if recs[t.name] is None]
        if self.bar is not None and todo:
            self.bar.set_postfix_str(todo[0].name[-48:])
        if todo:
            h = hessian_fn()
            for t in todo:
                recs[t.name] = self.quantize(t, h)
            del h
        for t in targets:
            self.finish(t, recs[t.name], install=self.sequential)


def _decode_record(rec: TensorRecord) -> torch.Tensor:
    """The decoded tensor of one record, through the same parser as a whole file."""
    data = encode_tbq({"kind": "record"}, {}, [rec])
    return parse_tbq(data, f"record {rec.name}").tensor(rec.name)


def _forward_hessian(model: nn.Module, module: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    acc = _GramHessian()
    h = module.register_forward_pre_hook(_input_hook(acc, stop=True))
    try:
        for b in batches:
            try:
                _run_model(model, b)
            except _Stop:
                pass
    finally:
        h.remove()
    return acc.hessian()


TIED_HEAD_SHARE = 0.5
"""Share of the LM head's proxy Hessian in that of a tied embedding / head matrix (see _tied_hessian)."""


def _tied_hessian(model: nn.Module, head: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Proxy Hessian of a matrix used as LM head and as token embedding (tied):
    ``s H_head / mean diag(H_head) + (1 - s) I`` with s = TIED_HEAD_SHARE, the two uses' proxies
    (the head's E[h h^T] of the final hidden states; plain MSE for the embedding) each
    normalised. Measured on the benchmark GPT (96 x 1024 tied, E8 at 2 bits, everything else full
    precision): perplexity 51.1 -> 56.5 with the identity, 54.6 with s = 0.5, 54.8 with s = 1 at a
    3% higher rate (LDLQ on the head's Hessian alone pushes errors into what the embedding uses).
    """
    h = _forward_hessian(model, head, batches).to(torch.float64)
    h = h / torch.diagonal(h).mean().clamp_min(1e-300)
    return TIED_HEAD_SHARE * h + (1.0 - TIED_HEAD_SHARE) * torch.eye(h.shape[0], dtype=torch.float64)


HESSIAN_BUDGET_BYTES = 1 << 30
"""Without ``sequential``, the Hessians of several layer groups of a block are taken in one pass
of the block while together they need at most this much memory (float64); otherwise one pass
per group."""


def _block_pass(block: nn.Module, modules: list[nn.Module], cached: list[_Cached], *, outputs: bool = False
                ) -> tuple[list[torch.Tensor], list[_Cached] | None]:
    """E[x x^T] of the inputs of ``modules`` (in execution order) over the cached block inputs;
    with ``outputs`` also the block's outputs (the next block's inputs), else each pass stops once
    the last of the modules has read its input."""
    accs = [_GramHessian() for _ in modules]
    handles = [m.register_forward_pre_hook(_input_hook(a, stop=not outputs and k == len(modules) - 1))
               for k, (m, a) in enumerate(zip(modules, accs, strict=True))]
    outs = [] if outputs else None
    try:
        for c in cached:
            try:
                y = _call_block(block, c.hidden, c.args, c.kwargs)
            except _Stop:
                continue
            if outs is not None:
                outs.append(_Cached(y, c.args, c.kwargs))
    finally:
        for h in handles:
            h.remove()
    return [a.hessian() for a in accs], outs


def _chunks(groups: list[list[_Target]], sequential: bool, budget: int) -> list[list[list[_Target]]]:
    if sequential:
        return [[g] for g in groups]
    out: list[list[list[_Target]]] = [[]]
    used = 0
    for g in groups:
        d = g[0].weight().shape[1]
        need = 8 * d * d
        if out[-1] and used + need > budget:
            out.append([])
            used = 0
        out[-1].append(g)
        used += need
    return out


def _store_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """``dtype`` for a floating tensor wider than it whose values stay finite in it, else its own."""
    if not t.is_floating_point() or t.element_size() <= torch.empty((), dtype=dtype).element_size():
        return t.dtype
    c = t.detach().to(dtype)
    if bool(torch.isfinite(t).all()) and not bool(torch.isfinite(c).all()):
        return t.dtype
    return dtype


def _common_dtype(plan: _Plan) -> str:
    """The dtype most quantized weights have (entries of that dtype need not repeat it)."""
    names = [str(t.module.weight.dtype).removeprefix("torch.") for t in plan.targets]
    return max(sorted(set(names)), key=names.count)


def default_embedding_bits(bits: int, codebook: str) -> int:
    """The next allowed setting above ``bits`` (uniform 2 -> 3 -> 4 -> 8, e8 2 -> 3 -> 4), capped.

    At low rates the embedding, tied to the LM head, dominates the loss: on the benchmark GPT at
    2 bits (E8, LDLQ + RHT) it alone raised the perplexity from 51.1 to 55.5 and every linear
    layer together to 51.5; coding it at 3 bits and the linear layers coarser, at the same total
    C, gave 52.7 instead of 56.2 (benchmarks/bench_quantize_models.py). QuIP# and GPTQ keep
    embeddings and the head in 16 bits altogether.
    """
    from .weight import E8_BITS, UNIFORM_BITS

    allowed = E8_BITS if codebook == "e8" else UNIFORM_BITS
    above = [b for b in allowed if b > bits]
    return above[0] if above else max(allowed)


def quantize_model_to_tbq(
    model: nn.Module,
    calibration_tokens,
    *,
    bits: int,
    codebook: str = "e8",
    method: str = "ldlq",
    incoherence: bool = True,
    seed: int = 0,
    sequential: bool = False,
    embedding_bits: int | None = None,
    damp: float = 0.01,
    group_size: int | None = None,
    unquantized_dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    partial_dir: str | None = None,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    run_extra: dict[str, Any] | None = None,
) -> TBQ:
    """Quantize ``model`` (our GPT or a Hugging Face causal LM) into a ``.tbq`` held in memory.

    Args:
        model: the full-precision model (modified in place: on return it carries exactly the
            decoded weights of the returned file, fp16 norms included).
        calibration_tokens: LongTensor [sequences, length] (or a list of such batches) of the
            user's data; see :func:`calibration_windows`.
        bits, codebook, method, incoherence, damp, group_size: as in
            :func:`tokenbounds.quant.quantize_weight` (``bits`` in {2, 3, 4, 8} for uniform,
            {2, 3, 4} for e8), used for every linear layer and embedding.
        seed: tensor k (in state-dict order among the quantized ones) uses Hadamard seed ``seed + k``.
        sequential: calibrate each layer on the outputs of the already quantized ones.
        embedding_bits: bits of the embeddings (and a head tied to one); default
            :func:`default_embedding_bits` (the next setting above ``bits``).
        unquantized_dtype: storage of the kept floating-point tensors (norms, biases).
        batch_size: calibration sequences per forward pass (when a tensor is given).
        partial_dir: where finished tensors are saved for resuming a killed run (None: no resume).
        restart: discard what ``partial_dir`` holds.
        run_extra: more fields that identify the run in ``partial_dir`` (e.g. the thread count).

    Returns:
        The parsed file (:class:`~tokenbounds.quant.tbq.TBQ`; ``.data`` is its bytes, ``.info``
        the per-tensor proxy losses and seconds). Its ``state_dict()`` is what ``model`` now holds.
    """
    check_quantizer_args(bits, codebook, method, group_size, seed, damp)
    embedding_bits = default_embedding_bits(bits, codebook) if embedding_bits is None else embedding_bits
    try:
        check_quantizer_args(embedding_bits, codebook, method, group_size, seed, damp)
    except ValueError as exc:
        raise ValueError(f"embedding_bits: {exc}") from None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    log = log or (lambda msg: None)
    batches = _as_batches(calibration_tokens, batch_size)
    plan = _plan(model, seed)
    emb = next((t.module for t in plan.targets if t.kind == "embedding" and isinstance(t.module, nn.Embedding)), None)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or (emb.num_embeddings if emb is not None else None)
    top = max(int(b.max()) for b in batches)
    if vocab is not None and (top >= int(vocab) or min(int(b.min()) for b in batches) < 0):
        raise ValueError(f"calibration tokens contain id {top}, outside the model's vocabulary of {vocab} "
                         "(data tokenized for another model, or the wrong --token-dtype?)")
    settings = {"bits": int(bits), "embedding_bits": int(embedding_bits), "codebook": codebook, "method": method, "incoherence": bool(incoherence),
                "seed": int(seed), "group_size": group_size, "damp": float(damp), "sequential": bool(sequential),
                "embedding_hessian": "identity; tied head: (E[h h^T] / mean diag + I) / 2", "store": str(unquantized_dtype).removeprefix("torch."),
                "dtype": _common_dtype(plan),
                "calibration_tokens": int(sum(b.numel() for b in batches)),
                "calibration_sequences": int(sum(b.shape[0] for b in batches))}
    arch = architecture_of(model)
    store = _PartStore(partial_dir, {"format": RUN_FORMAT, "architecture": arch, "settings": settings,
                                     "weights_sha256": _fingerprint_state(model) if partial_dir else None,
                                     "calibration_sha256": _tokens_digest(batches),
                                     "batches": [list(b.shape) for b in batches], "extra": run_extra or {}},
                       restart=restart, log=log)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.targets), desc="quantize", unit="tensor", dynamic_ncols=True)
    run = _Run(model, batches, store, plan, settings, bool(sequential), bar, log,
               index={t.name: k for k, t in enumerate(plan.targets)})
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    try:
        with torch.no_grad():
            _quantize_linears(run)
            for t in plan.targets:  # embeddings (and heads tied to them): identity Hessian
                if t.kind == "embedding":
                    run.group([t], lambda t=t: None if t.head is None else _tied_hessian(model, t.head, batches))
        t_assemble = time.perf_counter()
        records = []
        state = model.state_dict()
        for name in plan.names:
            if plan.stored[name] != name:
                records.append(tied_record(name, plan.stored[name]))
            elif name in run.info:
                records.append(store.records[name])
            else:
                t = state[name]
                records.append(raw_record(name, t, _store_dtype(t, unquantized_dtype)))
        tbq = parse_tbq(encode_tbq(arch, settings, records))
        apply_tbq(model, tbq)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    total = time.perf_counter() - t_start
    quant_s = sum(v.get("seconds", 0.0) for v in run.info.values())
    assemble_s = time.perf_counter() - t_assemble
    object.__setattr__(tbq, "info", {
        "tensors": run.info, "seconds": round(total, 3),
        "phases": {"quantize_weight": round(quant_s, 3), "encode_decode_apply": round(assemble_s, 3),
                   "forwards_and_hessians": round(total - quant_s - assemble_s, 3)}})
    log(f"quantized {len(plan.targets)} tensors in {time.perf_counter() - t_start:.1f} s: "
        f"C = {tbq.coded_bits:,.0f} bits ({tbq.coded_bits / max(1, tbq.num_parameters):.3f} bits/parameter)")
    return tbq


def _quantize_linears(run: _Run) -> None:
    plan, model, batches = run.plan, run.model, run.batches
    linear = [t for t in plan.targets if t.kind == "linear"]
    in_blocks = [t for t in linear if t.block is not None]
    outside = [t for t in linear if t.block is None]
    blocks = plan.blocks
    if blocks is not None and in_blocks and not _chain_matches(model, blocks, batches[0][:1]):
        run.log(f"{plan.blocks_name}: running the blocks one by one does not reproduce the model's forward "
                "(per-block arguments?); using one forward of the whole model per layer group")
        outside = linear
        in_blocks = []
    if in_blocks:
        cached = _capture_block_inputs(model, blocks[0], batches)
        for i, blk in enumerate(blocks):
            mine = [t for t in in_blocks if t.block == i]
            nxt = None
            more = i + 1 < len(blocks)
            if mine:
                c0 = cached[0]
                groups = _group_by_input(mine, lambda b=blk, c=c0: _call_block(b, c.hidden, c.args, c.kwargs))
                chunks = _chunks(groups, run.sequential, HESSIAN_BUDGET_BYTES)
                # full-precision blocks: the pass that takes the Hessians also gives the outputs
                fuse = more and not run.sequential and len(chunks) == 1
                for chunk in chunks:
                    pending = [g for g in chunk if run.pending(g)]
                    hs: dict[int, torch.Tensor] = {}
                    if pending or fuse:
                        h_list, nxt = _block_pass(blk, [g[0].module for g in pending], cached, outputs=fuse)
                        hs = dict(zip(map(id, pending), h_list, strict=True))
                    for group in chunk:
                        run.group(group, lambda g=group, hs=hs: hs.pop(id(g)))
            if more:
                cached = nxt if nxt is not None else [
                    _Cached(_call_block(blk, c.hidden, c.args, c.kwargs), c.args, c.kwargs) for c in cached]
        del cached
    groups = _group_by_input(outside, lambda: _run_model(model, batches[0][:1])) if outside else []
    for group in groups:
        run.group(group, lambda g=group: _forward_hessian(model, g[0].module, batches))
