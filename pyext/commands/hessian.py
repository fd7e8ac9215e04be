"""`tokenbounds hessian`: Hessian trace / spectrum of a model's token loss; writes JSON + a PNG."""

from __future__ import annotations

import argparse

HELP = "Estimate Hessian trace / spectrum of a model's token loss; writes JSON + a PNG."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory: a tokenbounds GPT (config.json + model.pt) or a local "
                             "Hugging Face causal LM (needs transformers)")
    parser.add_argument("--data", required=True, help="nanoGPT-style token file (.bin), memory-mapped")
    parser.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16", help="token dtype of --data")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(128, context))")
    parser.add_argument("--num-batches", type=int, default=1, help="batches averaged into H (default 1)")
    parser.add_argument("--operator", choices=("hessian", "ggn"), default="hessian",
                        help="the Hessian (indefinite) or the Gauss-Newton matrix (PSD)")
    parser.add_argument("--method", choices=("auto", "autograd", "func"), default="auto",
                        help="Hessian-vector products (Hutch++ sketch, Lanczos): double backward "
                             "(autograd) or torch.func forward-over-reverse; auto = the faster for the block size")
    parser.add_argument("--quadratic", choices=("auto", "taylor", "hvp"), default="auto",
                        help="Hutchinson's z^T H z: second-order forward mode without H z (taylor), "
                             "z . H z (hvp), or auto = taylor unless the model uses an op without a rule")
    parser.add_argument("--num-matvecs", type=int, default=30, help="matvecs for Hutchinson and Hutch++ (default 30)")
    parser.add_argument("--num-probes", type=int, default=8, help="SLQ probes (default 8)")
    parser.add_argument("--lanczos-steps", type=int, default=30, help="Lanczos steps per probe (default 30)")
    parser.add_argument("--deflation-steps", type=int, default=0, help="SLQ deflation Lanczos steps (default 0)")
    parser.add_argument("--probe-block", type=int, default=None,
                        help="probes per pass (default: up to 16, as many as fit a 1 GiB budget)")
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4], help="QuIP table bit widths")
    parser.add_argument("--no-quip", action="store_true", help="skip the per-layer QuIP table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="run the model in float64")
    parser.add_argument("--out", default="hessian_out", help="output directory (hessian.json, spectral_density.png)")


def load_model(directory: str):
    """A tokenbounds GPT directory or a local Hugging Face causal LM (:func:`tokenbounds.eval.models.load_model`,
    eager attention: SDPA has no double backward on CPU); returns (model, model type)."""
    import os

    from tokenbounds.eval.models import load_model as load

    if not os.path.exists(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory} has no config.json: pass a model directory")
    lm = load(directory, attn_implementation="eager")
    return lm.model, lm.kind.removeprefix("hf:")


def sample_batches(path: str, dtype: str, vocab_size: int, batch_size: int, seq_len: int, num_batches: int,
                   seed: int):
    """Random windows of seq_len + 1 tokens from a memory-mapped token file, as [B, T + 1] int64 tensors."""
    import numpy as np
    import torch

    data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if data.size < seq_len + 1:
        raise ValueError(f"{path} holds {data.size} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        starts = rng.integers(0, data.size - seq_len, size=batch_size)
        rows = np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        if rows.max() >= vocab_size:
            raise ValueError(
                f"{path} contains token id {int(rows.max())} >= vocab_size {vocab_size}; "
                f"wrong --dtype ({dtype}) or a file tokenized for another model?"
            )
        batches.append(torch.from_numpy(rows))
    return batches


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys
    import time

    from tokenbounds.hessian import (
        GaussNewton,
        ModelHessian,
        collect_proxy_hessians,
        format_table,
        hutchinson_trace,
        hutchpp_trace,
        quip_link_table,
        slq_trace,
        spectral_density,
    )

    for name in ("batch_size", "num_batches", "num_matvecs", "num_probes", "lanczos_steps", "probe_block"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.num_matvecs < 3:
        print("error: --num-matvecs must be >= 3 (Hutch++ needs 3)", file=sys.stderr)
        return 2
    try:
        model, model_type = load_model(args.model)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.eval()
    if args.float64:
        model = model.double()
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    context = int(getattr(cfg, "context_length", 0) or getattr(cfg, "max_position_embeddings", 0) or 1024)
    seq_len = args.seq_len or min(128, context)
    if seq_len > context:
        print(f"error: --seq-len {seq_len} exceeds the model context {context}", file=sys.stderr)
        return 2
    try:
        batches = sample_batches(args.data, args.dtype, vocab, args.batch_size, seq_len, args.num_batches, args.seed)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.operator == "ggn":
        op = GaussNewton(model, batches, probe_block=args.probe_block, quadratic=args.quadratic)
    else:
        op = ModelHessian(model, batches, method=args.method, probe_block=args.probe_block,
                          quadratic=args.quadratic)
    n = op.shape[0]
    print(f"{args.operator}: {n} parameters, {len(batches)} x {args.batch_size} x {seq_len} tokens")
    results: dict = {"model": args.model, "model_type": model_type, "data": args.data, "operator": args.operator,
                     "num_parameters": n, "batch_size": args.batch_size, "seq_len": seq_len,
                     "num_batches": args.num_batches, "seed": args.seed, "estimates": {}}
    t0 = time.perf_counter()
    est = results["estimates"]
    est["trace_hutchinson"] = hutchinson_trace(op, args.num_matvecs, seed=args.seed).to_dict()
    est["trace_hutchpp"] = hutchpp_trace(op, args.num_matvecs, seed=args.seed).to_dict()
    results["quadratic_path"] = op.quadratic_path
    if op.taylor_unsupported:
        results["taylor_unsupported"] = op.taylor_unsupported
        print(f"note: Taylor mode unavailable ({op.taylor_unsupported}); used Hessian-vector products")
    for f in ("identity", "sqrt_abs", "sqrt_clamped"):
        est[f"slq_{f}"] = slq_trace(op, f, num_probes=args.num_probes, lanczos_steps=args.lanczos_steps,
                                    seed=args.seed, deflation_steps=args.deflation_steps).to_dict()
    density = spectral_density(op, num_probes=args.num_probes, lanczos_steps=args.lanczos_steps, seed=args.seed)
    results["spectral_density"] = density.to_dict()
    results["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    png = density.plot(os.path.join(args.out, "spectral_density.png"),
                       title=f"{args.operator} spectral density ({n} parameters)")
    results["spectral_density_png"] = png
    if not args.no_quip:
        hs = collect_proxy_hessians(model, batches)
        rows = quip_link_table(model, hs, bits=tuple(args.bits), seed=args.seed)
        results["quip_table"] = rows
        print(format_table(rows))
    path = os.path.join(args.out, "hessian.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    for key, e in est.items():
        print(f"{key:20s} {e['value']:14.6g} +- {e['stderr']:.3g}  ({e['num_matvecs']} matvecs)")
    print(f"wrote {path} and {png} ({results['seconds']:.1f} s)")
    return 0
