"""`tokenbounds evaluate`: token-level statistics and every bound for a model on its training data."""

from __future__ import annotations

import argparse

HELP = "Evaluate a local model (HF or tokenbounds GPT) on sampled training tokens; write stats, bounds, report."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", required=True, help="local model directory (HF causal LM, GGUF folder or tokenbounds GPT)")
    p.add_argument("--data", required=True, nargs="+", help=".bin token files (memmapped) or .txt/.jsonl text")
    p.add_argument("--sample-tokens", required=True, type=float, help="s: number of tokens to sample (e.g. 1e5)")
    p.add_argument("--out", required=True, help="run directory (outputs, log, checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--context-length", type=int, default=None,
                   help="max preceding tokens per sampled token (default: the model's, capped at 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="sampled tokens per forward pass (default 16)")
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="K",
                   help="checkpoint every K batches (default 8); part of the run's identity")
    p.add_argument("--cross-documents", action="store_true", help="let contexts cross end-of-text tokens")
    p.add_argument("--eot-id", type=int, default=None, help="end-of-text id (default: tokenizer EOS, else 0)")
    p.add_argument("--token-dtype", default="uint16", choices=("uint16", "uint32"), help=".bin dtype (default uint16)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default 'text')")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory / tokenizer.json if not in --model")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (auto when there is one)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, default=None,
                   help="quantize every tensor to a b-bit uniform grid + range coding; evaluate that model")
    g.add_argument("--coded-bits", type=float, default=None, help="code length C of the model in bits (given)")
    g.add_argument("--bits-per-param", type=float, default=None, help="C = b x number of parameters (assumed)")
    p.add_argument("--extra-bits", type=float, default=0.0, help="bits paying for post-hoc choices (default 0)")
    p.add_argument("--train-tokens", type=float, default=None,
                   help="m, if the data files are not the whole training set (default: their token count)")
    p.add_argument("--delta", type=float, default=0.05, help="failure probability (default 0.05)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, or 1 when the machine is busy)")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    import sys

    from tokenbounds.eval.checkpoint import CheckpointError
    from tokenbounds.eval.evaluate import EvalOptions, evaluate
    from tokenbounds.eval.hf import UnsupportedModel

    s = args.sample_tokens
    if s != int(s) or s < 1:
        print(f"tokenbounds evaluate: error: --sample-tokens must be a positive integer, got {s}", file=sys.stderr)
        return 2
    opts = EvalOptions(
        model=args.model, data=list(args.data), sample_tokens=int(s), out=args.out, seed=args.seed,
        context_length=args.context_length, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
        cross_documents=args.cross_documents, eot_id=args.eot_id, token_dtype=args.token_dtype,
        text_field=args.text_field, dtype=args.dtype, device=args.device, bits=args.bits,
        coded_bits=args.coded_bits, bits_per_param=args.bits_per_param, extra_bits=args.extra_bits,
        train_tokens=args.train_tokens, delta=args.delta, gguf_file=args.gguf_file, tokenizer=args.tokenizer,
        restart=args.restart, progress=not args.no_progress, threads=args.threads, plots=not args.no_plots,
    )
    try:
        doc = evaluate(opts)
    except (CheckpointError, UnsupportedModel, ValueError, FileNotFoundError) as exc:
        print(f"tokenbounds evaluate: error: {exc}", file=sys.stderr)
        return 2
    if doc is not None:
        ev = doc["evaluation"]
        print(f"wrote {args.out}/stats.json, bounds.json, report.md (s = {ev['s']:,}, m = {ev['m']:,.0f}, "
              f"C = {ev['coded']['coded_bits']:.6g} bits: {ev['coded']['method']})")
    return 0
