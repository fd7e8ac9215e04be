"""`tokenbounds plan`: estimated time, memory and GPUs for an evaluation (roofline model)."""

from __future__ import annotations

import argparse

HELP = "Estimate time, memory and GPUs for an evaluation from a roofline model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--params", type=float, required=True, help="number of model parameters, e.g. 70e9")
    p.add_argument("--vocab", type=int, required=True, help="vocabulary size, e.g. 32000")
    p.add_argument("--sample-tokens", type=float, required=True, help="sampled tokens to evaluate, e.g. 1e6")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, l40s or cpu (default h100)")
    p.add_argument("--context", "--window", type=int, default=4096,
                   help="context length = window length T (default 4096)")
    p.add_argument("--stride", type=int, default=None,
                   help="targets scored per window, as for `tokenbounds evaluate` (default T / 2): the body's "
                        "cost of a forward pass is shared by S scored tokens")
    p.add_argument("--per-token-contexts", action="store_true",
                   help="estimate the paper's rule instead: one forward pass per scored token")
    p.add_argument("--mean-context", type=float, default=None,
                   help="mean context per sampled token (default: --context; shorter with short documents)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32", "int8"))
    p.add_argument("--d-model", type=int, default=None, help="hidden size (default: guessed from --params)")
    p.add_argument("--n-layer", type=int, default=None, help="layers (default: guessed from --params)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--mfu", type=float, default=0.5, help="assumed fraction of peak FLOP/s (default 0.5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from tokenbounds.eval.plan import estimate, format_plan, gpu_table

    if args.list_gpus:
        print(gpu_table())
        return 0
    if args.per_token_contexts and args.stride is not None:
        print("tokenbounds plan: error: --stride and --per-token-contexts exclude each other", file=sys.stderr)
        return 2
    stride = None if args.per_token_contexts else (args.stride if args.stride is not None
                                                     else max(1, args.context // 2))
    try:
        plan = estimate(args.params, args.vocab, args.sample_tokens, gpu=args.gpu.lower(), context=args.context,
                        mean_context=args.mean_context, dtype=args.dtype, d_model=args.d_model,
                        n_layer=args.n_layer, batch=args.batch_size, mfu=args.mfu,
                        stride=stride)
    except ValueError as exc:
        print(f"tokenbounds plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan))
        print()
        print(gpu_table())
    return 0
