"""``tokenbounds plan``: a roofline estimate of the time, memory and GPUs an evaluation needs.

**An estimate, not a measurement.** Each sampled token is scored from its own context (the
token-level bound's sampling, Lotfi, Kuang et al. 2024): one forward pass over ``c`` context
tokens (c = the mean context length, at most ``--context``) whose final hidden state at the last
position goes through the fused head. Per sampled token:

* FLOPs:  ``2 N_body c``  (every weight multiply-added once per context token)
  ``+ 2 n_layer c^2 d``  (causal attention: QK^T and AV, half of the c x c square each)
  ``+ 2 d V``  (the fused LM head, one row).
* Bytes:  weights are read once per batch of B sequences, ``N bytes_w / B``; activations
  ``~ 16 n_layer c d bytes_a`` (residual stream read+written by ~8 kernels per layer; attention
  by a flash kernel, no c x c matrix); the head reads ``V d bytes_w / B`` plus a logit tile.
* time = max(FLOPs / (peak x ``mfu``), bytes / (bandwidth x ``bw_eff``)) (roofline), with
  ``mfu`` = 0.5 and ``bw_eff`` = 0.8 by default: typical, not guaranteed.
* memory per GPU: weights / g + activations of one batch + the fused head's logit tiles
  (``max_bytes``, 512 MiB on CUDA), compared with a plain HF forward that materialises
  ``B c V`` float32 logits.
* GPUs: the fewest (a power of 2) that hold the weights with 10% headroom (tensor parallel), and the
  time on that many; data-parallel replicas divide the time further.

The model shape (d, n_layer) is guessed from N as ``N ~ 12 n_layer d^2`` with
``n_layer = d / 128`` (Llama-2-70B: d = 8192, 80 layers) unless given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

GPUS: dict[str, dict[str, Any]] = {
    # peak dense FLOP/s by dtype (fp32 = TF32 tensor cores on NVIDIA), memory bandwidth, memory
    "h100": {"name": "NVIDIA H100 SXM 80GB", "flops": {"fp32": 495e12, "bf16": 989e12, "fp16": 989e12,
                                                        "int8": 1979e12}, "bandwidth": 3.35e12, "memory": 80e9},
    "h200": {"name": "NVIDIA H200 SXM 141GB", "flops": {"fp32": 495e12, "bf16": 989e12, "fp16": 989e12,
                                                         "int8": 1979e12}, "bandwidth": 4.8e12, "memory": 141e9},
    "a100": {"name": "NVIDIA A100 SXM 80GB", "flops": {"fp32": 156e12, "bf16": 312e12, "fp16": 312e12,
                                                        "int8": 624e12}, "bandwidth": 2.039e12, "memory": 80e9},
    "l40s": {"name": "NVIDIA L40S 48GB", "flops": {"fp32": 183e12, "bf16": 362e12, "fp16": 362e12,
                                                    "int8": 733e12}, "bandwidth": 0.864e12, "memory": 48e9},
    "cpu": {"name": "CPU, 16 cores AVX2+FMA @ 3 GHz (2 x 8-wide FMA per cycle)",
            "flops": {"fp32": 1.5e12, "bf16": 1.5e12, "fp16": 1.5e12, "int8": 3.0e12},
            "bandwidth": 0.1e12, "memory": 128e9},
}
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0}


@dataclass(frozen=True)
class Plan:
    gpu: str
    gpu_name: str
    params: float
    vocab: int
    sample_tokens: float
    context: int
    mean_context: float
    dtype: str
    d_model: int
    n_layer: int
    batch: int
    flops_per_token: float
    bytes_per_token: float
    arithmetic_intensity: float
    bound_by: str
    seconds_per_token_one_gpu: float
    weights_bytes: float
    activation_bytes: float
    fused_head_bytes: float
    naive_logits_bytes: float
    gpus_to_fit: int
    memory_per_gpu_bytes: float
    seconds_on_fit: float
    seconds_by_gpus: dict[int, float] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def guess_shape(params: float) -> tuple[int, int]:
    """(d_model, n_layer) with 12 n_layer d^2 ~ params and n_layer = d / 128."""
    d = (params * 128 / 12) ** (1 / 3)
    d = max(64, int(round(d / 128)) * 128) if d >= 128 else max(16, int(round(d)))
    n_layer = max(1, int(round(params / (12 * d * d))))
    return d, n_layer


def estimate(params: float, vocab: int, sample_tokens: float, *, gpu: str = "h100", context: int = 4096,
             mean_context: float | None = None, dtype: str = "bf16", d_model: int | None = None,
             n_layer: int | None = None, batch: int = 8, mfu: float = 0.5, bw_eff: float = 0.8,
             head_tile_bytes: float = 512 * 2**20, stride: int | None = None) -> Plan:
    """``stride=None``: per-token contexts (one forward pass of c tokens per scored token);
    ``stride=S``: windows of ``context`` tokens scoring their last S targets (the body's cost of a
    window is shared by S scored tokens; the head still costs 2 d V per scored token)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; choose from {sorted(GPUS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose from {sorted(DTYPE_BYTES)}")
    for name, v in (("params", params), ("vocab", vocab), ("sample_tokens", sample_tokens), ("context", context),
                    ("batch", batch)):
        if not v or v <= 0 or not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if not (0 < mfu <= 1 and 0 < bw_eff <= 1):
        raise ValueError("mfu and bw_eff must lie in (0, 1]")
    g = GPUS[gpu]
    gd, gl = guess_shape(params)
    d = int(d_model or gd)
    layers = int(n_layer or (gl if d_model is None else max(1, round(params / (12 * d * d)))))
    c = float(mean_context if mean_context is not None else context)
    bw = DTYPE_BYTES[dtype]
    head_params = vocab * d
    body = max(params - head_params, params * 0.5)
    if stride is not None and not 1 <= stride <= context:
        raise ValueError(f"--stride must lie in [1, --context], got {stride}")
    share = float(stride) if stride else 1.0  # scored tokens per forward pass
    flops = (2 * body * c + 2 * layers * c * c * d) / share + 2 * d * vocab
    act_bytes_tok = 16 * layers * c * d * 2.0 / share  # activations in bf16/fp32 mix, ~2 bytes
    bytes_tok = params * bw / batch + act_bytes_tok + vocab * 4.0 / 1.0
    peak = g["flops"][dtype] * mfu
    band = g["bandwidth"] * bw_eff
    t_compute = flops / peak
    t_memory = bytes_tok / band
    t_tok = max(t_compute, t_memory)
    weights = params * bw
    activations = batch * context * d * 2.0 * 4  # a few live residual-stream tensors of one batch
    fused = min(head_tile_bytes, batch * vocab * 4.0) + batch * d * 4.0
    naive = batch * context * vocab * 4.0
    usable = 0.9 * g["memory"]
    room = usable - activations - fused  # activations and head tiles are not sharded (conservative)
    if room <= 0:
        raise ValueError(f"one batch of activations ({activations / 1e9:.1f} GB) does not fit a {gpu}; "
                         "lower --batch-size or --context")
    fit = 1 << max(0, math.ceil(math.log2(max(1.0, weights / room))))  # tensor-parallel degree: power of 2
    mem_per = weights / fit + activations + fused
    # Model-parallel shards share each token's work: ideal split, 10% communication overhead per 2x.
    eff = 1.0 / (1.0 + 0.1 * math.log2(fit)) if fit > 1 else 1.0
    secs_fit = sample_tokens * t_tok / (fit * eff)
    by_gpus = {}
    for n in sorted({fit, 8, 64, 512} | {fit * 2}):
        if n >= fit:
            replicas = n // fit
            by_gpus[n] = secs_fit / replicas
    assumptions = [
        "an ESTIMATE from a roofline model, not a measurement; real runs differ (kernels, parallelism, I/O)",
        (f"each sampled token is scored from its own context of c = {c:g} tokens (one forward pass per token)"
         if not stride else f"windows of {c:g} tokens score their last {stride} targets (one forward pass per "
         f"{stride} scored tokens)"),
        f"model shape d = {d}, {layers} layers ({'given' if d_model else 'guessed from N: 12 n_layer d^2 = N'})",
        f"matmul efficiency {mfu:.0%} of peak {dtype} FLOP/s; {bw_eff:.0%} of peak memory bandwidth",
        f"weights read once per batch of {batch} sequences; flash attention (no c x c matrix in memory)",
        "fused head: logits exist only as tiles (<= 512 MiB), never B x c x V",
        "GPUs to fit: weights + one batch of activations in 90% of GPU memory, rounded up to a power of 2; "
        "tensor/pipeline parallel "
        "with 10% overhead per doubling; extra GPUs used as data-parallel replicas",
    ]
    return Plan(gpu, g["name"], float(params), int(vocab), float(sample_tokens), int(context), c, dtype, d, layers,
                int(batch), flops, bytes_tok, flops / bytes_tok, "compute" if t_compute >= t_memory else "memory",
                t_tok, weights, activations, fused, naive, fit, mem_per, secs_fit, by_gpus, assumptions)


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _fmt_bytes(b: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b / 1e3:.1f} kB"


def format_plan(p: Plan) -> str:
    lines = [
        f"ESTIMATE (roofline model) for evaluating {p.sample_tokens:.3g} sampled tokens of a "
        f"{p.params:.3g}-parameter model (V = {p.vocab:,}, context {p.context}, {p.dtype}) on {p.gpu_name}",
        "",
        f"  per sampled token:   {p.flops_per_token:.3g} FLOPs, {_fmt_bytes(p.bytes_per_token)} moved "
        f"(intensity {p.arithmetic_intensity:.0f} FLOP/byte: {p.bound_by}-bound)",
        f"  one device:          {_fmt_time(p.seconds_per_token_one_gpu)} per token "
        f"({1 / p.seconds_per_token_one_gpu:.3g} tokens/s) if the model fitted",
        f"  weights:             {_fmt_bytes(p.weights_bytes)}",
        f"  GPUs to hold it:     {p.gpus_to_fit} ({_fmt_bytes(p.memory_per_gpu_bytes)} per GPU: weights shard + "
        f"{_fmt_bytes(p.activation_bytes)} activations + {_fmt_bytes(p.fused_head_bytes)} fused-head tiles)",
        f"  fused head memory:   {_fmt_bytes(p.fused_head_bytes)} vs {_fmt_bytes(p.naive_logits_bytes)} for "
        f"plain HF logits (batch {p.batch} x {p.context} x V float32)",
        f"  time on {p.gpus_to_fit} device(s): {_fmt_time(p.seconds_on_fit)}",
    ]
    for n, s in p.seconds_by_gpus.items():
        if n != p.gpus_to_fit:
            lines.append(f"  time on {n} devices:  {_fmt_time(s)} ({n // p.gpus_to_fit} data-parallel replicas)")
    lines += ["", "Assumptions:"] + [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)


def gpu_table() -> str:
    lines = [f"{'gpu':<6} {'bf16 TFLOP/s':>13} {'fp32 TFLOP/s':>13} {'bandwidth TB/s':>15} {'memory GB':>10}  name"]
    for k, g in GPUS.items():
        lines.append(f"{k:<6} {g['flops']['bf16'] / 1e12:>13.0f} {g['flops']['fp32'] / 1e12:>13.1f} "
                     f"{g['bandwidth'] / 1e12:>15.3f} {g['memory'] / 1e9:>10.0f}  {g['name']}")
    return "\n".join(lines)
